"""The token cache: every shard of every source file tokenized once, stored by content, reused by any config.

A shard (ptflow/data/sources.py: a byte range of a file, or a group of row groups) is an artifact of
the `tokenize` stage whose key is (file bytes sha256, shard range, format, text column, tokenizer
digest, this code's version): never a path or a config. It holds `tokens.npy` (each document's
ids followed by EOS, concatenated; uint16 when the vocabulary fits), `doc_ends.npy` (cumulative
document ends, int64) and `doc_hashes.npy` (a hash of each document's text, for `val_size`). So a
dataset is an assembly of cached shards: a config that shares a file with an earlier one reuses its shards, adding a file to a folder tokenizes only that file, a new
tokenizer re-tokenizes everything, and packing settings (cutoff_len, packing, doc_mask) never
re-tokenize. Each shard is written atomically, so an interrupted preparation resumes with the
shards that were not finished.

Tokenization runs in a `WorkerPool` (workers.py) of `preprocessing_num_workers` processes (default: every core), each
encoding whole shards with the Rust tokenizer (`encode_batch_fast`, no offsets) and writing
numpy arrays; small jobs run in-process, where the Rust tokenizer itself uses every core.

    results = tokenize_sources(plans, tokenizer, tokenizer_digest, layout, workers=None)
    tokens, doc_ends = open_shard(results["corpus"].shards[0].path)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np

from ptflow import faults
from ptflow.data.fastencode import WordEncoder
from ptflow.data.sources import MIN_SHARD_BYTES, Shard, Source, read_shard
from ptflow.data.tokenizer import open_tokenizer
from ptflow.data.workers import WorkerPool, default_workers
from ptflow.store import sync
from ptflow.store.entries import (
    DigestMemo,
    build_or_reuse,
    key_lock,
    lookup,
    stage_key,
    write_json_atomic,
)
from ptflow.store.layout import Layout
from ptflow.store.stage import library_version

log = logging.getLogger("ptflow.shards")

STAGE = "tokenize"
# Bump when a code change must re-tokenize cached shards (their bytes would differ); editing code does not.
FORMAT_VERSION = 2  # 2: per-document content hashes (doc_hashes.npy) for the held-out split
LIBRARIES = ("tokenizers", "transformers")  # their versions can change the token ids
INLINE_BYTES = 4 << 20  # below this much text to tokenize, starting worker processes costs more than it saves


@dataclass(frozen=True)
class Encoding:
    """What a worker needs to tokenize exactly as the parent would: the serialized Rust tokenizer, EOS, dtype."""

    tokenizer_json: str | None
    eos_token_id: int
    dtype: str
    batch_size: int


@dataclass(frozen=True)
class ShardTask:
    shard: Shard
    key: str
    components: dict
    size: int  # bytes of text, for progress and scheduling


@dataclass
class ShardResult:
    shard: Shard
    path: str
    documents: int
    tokens: int
    hit: bool
    seconds: float = 0.0
    damaged: bool = False  # its stored entry was damaged and has been re-tokenized
    started: float = 0.0  # wall clock (time.time()) when a process began building it: timelines across workers


@dataclass
class SourceShards:
    """The cached shards of one source, in reading order, and why they were reused or built."""

    source: Source
    shards: list[ShardResult] = field(default_factory=list)
    reason: str = ""

    @property
    def reused(self) -> int:
        return sum(r.hit for r in self.shards)

    @property
    def built(self) -> int:
        return sum(not r.hit for r in self.shards)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def encoding_for(tokenizer, batch_size: int) -> Encoding:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    return Encoding(backend.to_str() if backend is not None else None, int(tokenizer.eos_token_id),
                    token_dtype(len(tokenizer)).name, batch_size)


def encoder_version() -> dict:
    """What besides the file and tokenizer decides a shard's tokens: the format version and library versions."""
    return {"format": FORMAT_VERSION, **{name: library_version(name) for name in LIBRARIES}}


def shard_components(shard: Shard, file_digest: str, tokenizer_digest: str, code: dict) -> dict:
    return {"stage": STAGE, "code": code,
            "config": {"format": shard.format, "compression": shard.compression, "column": shard.column,
                       "range": [shard.start, shard.stop]},
            "inputs": {"file": file_digest, "tokenizer": tokenizer_digest}}


def encode_texts(texts: list[str], encode: Callable[[list[str]], list[list[int]]], eos: int, dtype: np.dtype,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens: each text's ids + EOS, concatenated; doc_ends: cumulative end of each document). An encoder with
    `packed(texts, dtype)` (the fast path) hands over each document's ids as bytes: joined with EOS, no lists."""
    parts, lengths = [], []
    packed = getattr(encode, "packed", None)
    eos_bytes = np.array([eos], dtype=dtype).tobytes()
    for start in range(0, len(texts), batch_size):
        docs = packed(texts[start: start + batch_size], dtype) if packed is not None else None
        if docs is not None:
            parts.append(np.frombuffer(eos_bytes.join(docs) + eos_bytes, dtype=dtype))
            lengths.append(np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) // dtype.itemsize + 1)
            continue
        ids = encode(texts[start: start + batch_size])
        for doc in ids:
            doc.append(eos)
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        parts.append(np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(n.sum())))
        lengths.append(n)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, dtype=np.int64)
    return tokens, ends


def plain_backend(rust):
    """The Rust tokenizer without the truncation and padding its tokenizer.json may carry (BERT-family and
    sentence-transformers files ship `max_length: 128` and fixed padding): `tokenizer(texts)` applies neither
    by default, the Rust pipeline both. A copy, so the caller's tokenizer is left as it was."""
    if rust.truncation is None and rust.padding is None:
        return rust
    plain = type(rust).from_str(rust.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


class Encoder:
    """texts -> id lists, exactly as `tokenizer(texts, add_special_tokens=False)`; the fast word path when it applies.

    `check(texts)` compares the fast path with the Rust pipeline on the beginning of a shard's
    texts; on any difference the fast path is dropped for good (and the shard re-encoded).
    """

    SAMPLE_DOCS, SAMPLE_CHARS = 4, 8192

    def __init__(self, rust=None, slow_tokenizer=None):
        self.rust, self.slow_tokenizer = plain_backend(rust) if rust is not None else None, slow_tokenizer
        rust = self.rust
        self.fast = WordEncoder.for_tokenizer(rust) if rust is not None else None

    @classmethod
    def of(cls, tokenizer) -> "Encoder":
        """The encoder of a transformers tokenizer: its Rust backend when fast, else the tokenizer itself."""
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        return cls(backend) if backend is not None else cls(slow_tokenizer=tokenizer)

    @classmethod
    def in_worker(cls, encoding: Encoding) -> "Encoder":
        """The encoder of a worker process, from the serialized Rust tokenizer; one process per core already, so
        no tokenizer threads on top."""
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(encoding.tokenizer_json))

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return self.fast(texts)
        return self.exact(texts)

    def packed(self, texts: list[str], dtype: np.dtype) -> list[bytes] | None:
        """Each text's ids as the bytes of a `dtype` array, from the fast path; None without it (or in another
        dtype), and the caller lists ids instead."""
        if self.fast is None or self.fast.dtype != dtype:
            return None
        return self.fast.packed(texts)

    def exact(self, texts: list[str]) -> list[list[int]]:
        if self.rust is None:
            return [list(ids) for ids in
                    self.slow_tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
        batch = getattr(self.rust, "encode_batch_fast", self.rust.encode_batch)  # no offsets: a bit faster
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def check(self, texts: list[str], where: str) -> None:
        if self.fast is None:
            return
        sample = [t[: self.SAMPLE_CHARS] for t in texts[: self.SAMPLE_DOCS]]
        if self.fast(sample) != self.exact(sample):
            log.warning("tokenize: the fast encoder differs from the tokenizer on %s; using the tokenizer's own "
                        "pipeline from now on", where)
            self.fast = None


def encode_shard(shard: Shard, encoder: Encoder, encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_ends) of one shard, read from its file and encoded (not stored)."""
    return _encode(read_shard(shard), shard, encoder, encoding)


def _encode(texts: list[str], shard: Shard, encoder: Encoder, encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    encoder.check(texts, shard.where)
    return encode_texts(texts, encoder, encoding.eos_token_id, np.dtype(encoding.dtype), encoding.batch_size)


def content_hashes(texts: list[str]) -> np.ndarray:
    """A 64-bit hash of each document's text (blake2b of its UTF-8 bytes): what `val_size` holds out by, so a
    document's split depends on its content alone -- not on the tokenizer, the seed or the rest of the corpus."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") for t in texts], dtype=np.uint64)


def tokenize_shard(layout: Layout, task: ShardTask, encoder: Encoder, encoding: Encoding) -> ShardResult:
    """Build (or find) one shard's artifact."""
    started, wall = time.perf_counter(), time.time()

    def build(folder: Path) -> dict:
        texts = read_shard(task.shard)
        tokens, ends = _encode(texts, task.shard, encoder, encoding)
        np.save(folder / "tokens.npy", tokens)
        np.save(folder / "doc_ends.npy", ends)
        np.save(folder / "doc_hashes.npy", content_hashes(texts))
        return {"documents": len(ends), "tokens": int(tokens.size), "file": task.shard.file,
                "range": [task.shard.start, task.shard.stop]}

    artifact = build_or_reuse(layout, STAGE, task.components, build, quiet=True)
    return ShardResult(task.shard, artifact.path, artifact.stats["documents"], artifact.stats["tokens"], artifact.hit,
                       time.perf_counter() - started, artifact.reason.startswith("cached entry is"), wall)


def open_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_ends) of a cached shard, memory-mapped."""
    folder = Path(path)
    return np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "doc_ends.npy")


def open_doc_hashes(path: str | Path) -> np.ndarray:
    """The content hash of each document of a cached shard (`content_hashes`)."""
    return np.load(Path(path) / "doc_hashes.npy")


# --------------------------------------------------------------------------- in a worker process (workers.py)


def worker_state(encoding: Encoding, root: str | None = None) -> dict:
    """What a tokenizer worker builds once: the encoder from the serialized tokenizer, and the store when it
    writes shards."""
    return {"encoding": encoding, "encoder": Encoder.in_worker(encoding),
            "layout": Layout(root) if root is not None else None}


def tokenize_in_worker(state: dict, task: ShardTask) -> ShardResult:
    return tokenize_shard(state["layout"], task, state["encoder"], state["encoding"])


# --------------------------------------------------------------------------- the whole job


def tokenize_sources(sources: list[Source], plans: dict[str, list[Shard]], tokenizer, tokenizer_digest: str,
                     layout: Layout, *, workers: int | None = None, batch_size: int = 1000,
                     doc_limits: dict[str, int] | None = None, memo: DigestMemo | None = None,
                     ) -> dict[str, SourceShards]:
    """Cached shards of every source (tokenizing the missing ones); `doc_limits` stops a source once it has
    that many documents (max_samples), so a debug run on a huge corpus reads only its first shards."""
    code = encoder_version()
    tasks, digests = plan_tasks(sources, plans, tokenizer_digest, layout, memo, code)
    encoding = encoding_for(tokenizer, batch_size)
    limits = {name: n for name, n in (doc_limits or {}).items() if n is not None}
    results = {name: [cached(layout, task) for task in ts] for name, ts in tasks.items()}

    todo = [(name, i) for name, ts in tasks.items() for i in _needed(results[name], limits.get(name))]
    todo_bytes = sum(tasks[n][i].size for n, i in todo)
    n_workers = max(1, workers or default_workers())
    if todo:
        inline = n_workers == 1 or len(todo) == 1 or todo_bytes < INLINE_BYTES or encoding.tokenizer_json is None
        log.info("prepare_dataset: tokenizing %d of %d shards (%.1f MiB of text) %s", len(todo),
                 sum(len(ts) for ts in tasks.values()), todo_bytes / 2**20,
                 "in this process" if inline else f"with {min(n_workers, len(todo))} worker processes")
        run = _run_inline if inline else _run_pool
        run(layout, tasks, results, todo, limits, encoding, tokenizer, min(n_workers, len(todo)))

    index = _read_index(layout)
    out = {}
    for source in sources:
        done = results[source.name][:_prefix_needed(results[source.name], limits.get(source.name))]
        out[source.name] = SourceShards(source, list(done),
                                        _explain(source, done, digests, tokenizer_digest, code, index))
    _update_index(layout, out, digests, tokenizer_digest, code)
    return out


def plan_tasks(sources: list[Source], plans: dict[str, list[Shard]], tokenizer_digest: str, layout: Layout,
               memo: DigestMemo | None = None, code: dict | None = None,
               ) -> tuple[dict[str, list[ShardTask]], dict[str, str]]:
    """(every shard of each source as a task with its cache key, the digest of each file)."""
    code = code or encoder_version()
    memo = memo or DigestMemo(layout)
    digests = {f: memo.digest(Path(f)) for s in sources for f in {sh.file for sh in plans[s.name]}}
    memo.save()
    tasks = {source.name: [ShardTask(sh, stage_key(c), c, _shard_size(sh))
                           for sh in plans[source.name]
                           for c in [shard_components(sh, digests[sh.file], tokenizer_digest, code)]]
             for source in sources}
    return tasks, digests


def cached(layout: Layout, task: ShardTask) -> ShardResult | None:
    """The shard's cache entry, or None when it is not built yet."""
    found, _ = lookup(layout, STAGE, task.key)
    if found is None:
        return None
    return ShardResult(task.shard, found.path, found.stats["documents"], found.stats["tokens"], True)


@lru_cache(maxsize=2)
def _encoder_for(tokenizer_dir: str, batch_size: int) -> tuple[Encoder, Encoding]:
    encoding = encoding_for(open_tokenizer(tokenizer_dir), batch_size)
    return Encoder.in_worker(encoding), encoding


def tokenize_task(root: str, tokenizer_dir: str, batch_size: int, task: ShardTask) -> ShardResult:
    """Build one shard's cache entry in any process that sees the store and the data at the same paths: the plain
    function an external executor runs per shard (flows/: a Dask cluster). The same key and the same bytes as
    the local pool, since the tokenizer is loaded from the same artifact and encoded the same way."""
    encoder, encoding = _encoder_for(tokenizer_dir, batch_size)
    return tokenize_shard(Layout(root), task, encoder, encoding)


def _shard_size(shard: Shard) -> int:
    """Bytes of text in a shard (exact for line formats; a file's size for whole-file shards; a guess otherwise)."""
    if shard.stop >= 0 and shard.format in ("jsonl", "txt") and shard.compression is None:
        return shard.stop - shard.start
    if shard.stop < 0:
        return os.path.getsize(shard.file)
    return MIN_SHARD_BYTES


def _prefix_needed(results: list[ShardResult | None], limit: int | None) -> int:
    """How many leading shards a source needs: all, or just enough to hold `limit` documents."""
    if limit is None:
        return len(results)
    docs = 0
    for i, r in enumerate(results):
        if r is None:
            return len(results)  # unknown yet: everything may be needed
        docs += r.documents
        if docs >= limit:
            return i + 1
    return len(results)


def _needed(results: list[ShardResult | None], limit: int | None) -> list[int]:
    return [i for i in range(_prefix_needed(results, limit)) if results[i] is None]


def _run_inline(layout, tasks, results, todo, limits, encoding, tokenizer, _workers) -> None:
    encoder = Encoder.of(tokenizer)
    progress = _progress(sum(tasks[n][i].size for n, i in todo))
    stored = 0
    try:
        for name, i in todo:
            if i >= _prefix_needed(results[name], limits.get(name)):
                continue  # max_samples reached with the shards before this one
            results[name][i] = tokenize_shard(layout, tasks[name][i], encoder, encoding)
            stored += 1
            faults.point(f"tokenize:stored-{stored}")
            progress.update(tasks[name][i].size)
    finally:
        progress.close()


def _run_pool(layout, tasks, results, todo, limits, encoding, _tokenizer, workers) -> None:
    progress = _progress(sum(tasks[n][i].size for n, i in todo))
    pool = WorkerPool(workers, worker_state, (encoding, str(layout.root)))
    futures: dict[Future, tuple[str, int]] = {}
    stored = 0  # shard results this process has received from its workers (each in the store by then)
    finished = False
    try:
        # max_samples sources first and in order (their later shards may be cancelled), then largest first
        order = sorted(todo, key=lambda t: (t[0] not in limits, t[1] if t[0] in limits else -tasks[t[0]][t[1]].size))
        for name, i in order:
            futures[pool.submit(tokenize_in_worker, tasks[name][i])] = (name, i)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.cancelled():
                    continue
                name, i = futures[future]
                results[name][i] = future.result()  # a worker's DataError is raised here, finished shards stay
                stored += 1
                faults.point(f"tokenize:stored-{stored}")
                progress.update(tasks[name][i].size)
                if limits.get(name) is not None:
                    enough = _prefix_needed(results[name], limits[name])
                    for other, (n2, j) in futures.items():
                        if n2 == name and j >= enough and other in pending and other.cancel():
                            pending.discard(other)
        finished = True
    finally:
        pool.close(wait=not finished)  # done: the idle workers exit in the background; failed: none still writes
        progress.close()


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tokenize", unit="B", unit_scale=True, disable=None, leave=False)


# --------------------------------------------------------------------------- explanations


def _read_index(layout: Layout) -> dict:
    import json

    sync.pull_file(layout, layout.stage_index(STAGE))  # an object store's index, shared by every machine
    try:
        return json.loads(layout.stage_index(STAGE).read_text())
    except (OSError, ValueError):
        return {}


def _update_index(layout: Layout, out: dict[str, SourceShards], digests: dict[str, str], tokenizer_digest: str,
                  code: str) -> None:
    """Remember what each file was last tokenized with, so a later miss can say what changed."""
    entries = {}
    for shards in out.values():
        for r in shards.shards:
            entries[str(Path(r.shard.file).resolve())] = {"digest": digests[r.shard.file], "tokenizer": tokenizer_digest,
                                                          "code": code, "column": r.shard.column}
    with key_lock(layout, STAGE, "index"):
        index = _read_index(layout)
        if all(index.get(k) == v for k, v in entries.items()):
            return
        index.update(entries)
        write_json_atomic(layout.stage_index(STAGE), index)
        sync.push_file(layout, layout.stage_index(STAGE))


def _explain(source: Source, done: list[ShardResult], digests: dict[str, str], tokenizer_digest: str, code: str,
             index: dict) -> str:
    """Why this source's shards were reused or built, file by file, in one line."""
    by_file: dict[str, list[ShardResult]] = {}
    for r in done:
        by_file.setdefault(r.shard.file, []).append(r)
    reasons: dict[str, list[str]] = {}
    for file, rs in by_file.items():
        hit, damaged = sum(r.hit for r in rs), sum(r.damaged for r in rs)
        if hit == len(rs):
            reason = "reused"
        elif damaged:
            reason = f"{damaged} damaged shard(s) in the store re-tokenized ({hit} of {len(rs)} reused)"
        elif hit:
            reason = f"resumed ({hit} of {len(rs)} shards were already tokenized)"
        else:
            prev = index.get(str(Path(file).resolve()))
            if prev is None:
                reason = "new file"
            elif prev["digest"] != digests[file]:
                reason = "file changed"
            elif prev["tokenizer"] != tokenizer_digest:
                reason = "tokenizer changed"
            elif prev["code"] != code:
                reason = "the token format version or the tokenizers/transformers version changed"
            elif prev["column"] != rs[0].shard.column:
                reason = f"column changed ({prev['column']} -> {rs[0].shard.column})"
            else:
                reason = "its shards were removed from the store"
        reasons.setdefault(reason, []).append(Path(file).name)
    if list(reasons) == ["reused"]:
        return f"reused all {len(done)} shards (same file bytes and tokenizer)"
    parts = []
    for reason, files in reasons.items():
        names = ", ".join(files[:3]) + (f" +{len(files) - 3} more" if len(files) > 3 else "")
        parts.append(f"{reason}: {names}")
    return "; ".join(parts)

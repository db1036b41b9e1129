"""Stage `prepare_dataset`: registered corpora -> cached token shards -> selected, mixed, packed, split blocks.

    from ptflow.data.dataset import prepare_dataset, open_blocks
    artifact = prepare_dataset(cfg.data, tokenizer_artifact, Layout.resolve(), seed=42)
    blocks, lengths = open_blocks(artifact, "train")          # (n, cutoff_len) memory-mapped

The recipe is LLaMA-Factory's pt data path (docs/data.md maps every key):
1. resolve `data.dataset` / `data.eval_dataset` in `<dataset_dir>/dataset_info.json` and check
   names, files, types, columns and first records before anything is tokenized (sources.py);
2. tokenize every shard of every file once per (file bytes, tokenizer) into the token cache,
   in parallel, reusing shards any earlier config tokenized (shards.py);
3. select documents (`num_samples`, `max_samples`) and mix the datasets (`mix_strategy`,
   `interleave_probs`) by document index (mixing.py);
4. split the documents: `val_size` holds out documents by a hash of their text, before packing (stable as
   the corpus grows: `held_out`), or `eval_dataset` names the eval documents;
5. pack each split: text + EOS concatenated and cut into `cutoff_len` blocks, dropping only the final
   partial block (or `packing: false`: one truncated, padded block per document) (packing.py), and store
   `train.npy` / `eval.npy` (+ `*_lengths.npy`, `*_doc_offsets.npy`/`*_doc_starts.npy`).

The stage's key covers the packing config, the tokenizer digest and each file's bytes; on a miss
the shard cache still makes re-packing (say a new cutoff_len) cost no tokenization. The log ends
with a table per dataset: shards reused or built and why, documents, tokens, mean length.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ptflow.data.assembly import DocumentOrder, Written, count_blocks, write_blocks
from ptflow.data.mixing import held_out
from ptflow.data.packing import DocStarts, load_doc_starts, save_doc_starts
from ptflow.data.shards import (
    INLINE_BYTES,
    ShardTask,
    SourceShards,
    cached,
    plan_tasks,
    token_dtype,
    tokenize_sources,
)
from ptflow.data.sources import (
    Source,
    check_sources,
    plan_shards,
    read_dataset_info,
    resolve_sources,
)
from ptflow.data.stream import StreamPlan, hold_out
from ptflow.data.tokenizer import open_tokenizer
from ptflow.data.workers import default_workers, start_early
from ptflow.errors import DataError
from ptflow.store.entries import Artifact, DigestMemo, build_or_reuse
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage

if TYPE_CHECKING:
    from ptflow.config.schema import DataSection

__all__ = ["STAGE", "Source", "check_sources", "components", "open_blocks", "open_doc_starts", "prepare_dataset",
           "read_dataset_info", "resolve_sources", "held_out", "shards_to_tokenize"]

log = logging.getLogger("ptflow.dataset")



def resolve_all(section: "DataSection") -> tuple[list[Source], list[Source]]:
    """(training sources, eval_dataset sources), every resolution problem of both reported at once."""
    problems, train, evals = [], [], []
    try:
        train = resolve_sources(section)
    except DataError as exc:
        problems.append(str(exc))
    if section.eval_dataset:
        try:
            evals = resolve_sources(section, section.eval_dataset)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        raise DataError("\n  - ".join(problems))
    return train, evals


def components(section: "DataSection", tokenizer: Artifact, layout: Layout, seed: int = 42) -> dict:
    return _components(section, resolve_all(section), tokenizer, layout, seed)


def _components(section: "DataSection", resolved: tuple[list[Source], list[Source]], tokenizer: Artifact,
                layout: Layout, seed: int) -> dict:
    train, evals = resolved
    memo = DigestMemo(layout)
    files = {f"{s.name}/{f.name}": memo.digest(f) for s in train + evals for f in s.files}
    memo.save()
    config = section.digest_fields()
    config.pop("dataset_dir")  # content, not location
    if _uses_seed(section, train + evals):
        config["seed"] = seed
    columns = {s.name: s.column for s in train + evals}
    sampled = {s.name: s.num_samples for s in train + evals if s.num_samples is not None}
    return {"config": {**config, "columns": columns, **({"num_samples": sampled} if sampled else {})},
            "inputs": {"tokenizer": tokenizer.digest, "files": files}}


def _uses_seed(section: "DataSection", sources: list[Source]) -> bool:
    random_mix = section.mix_strategy != "concat" and section.interleave_probs is not None
    shuffled_stream = section.streaming and section.shuffle_shards
    return random_mix or shuffled_stream or any(s.num_samples is not None for s in sources)


def prepare_dataset(section: "DataSection", tokenizer: Artifact, layout: Layout, seed: int = 42,
                    parts: dict | None = None) -> Artifact:
    """Tokenize (through the shard cache), mix and pack the configured datasets, or reuse an identical result."""
    resolved = resolve_all(section)
    train_sources, eval_sources = resolved
    check_sources(_unique(train_sources + eval_sources))
    if section.streaming:
        _check_streamable(train_sources)

    def build(folder: Path) -> dict:
        if not section.streaming:
            _start_workers_early(_unique(train_sources + eval_sources), section)
        tok = open_tokenizer(tokenizer.path)
        if section.streaming:
            return _build_stream(folder, section, train_sources, eval_sources, tok, tokenizer.digest, layout, seed)
        shards = _tokenize(_unique(train_sources + eval_sources), section, tok, tokenizer.digest, layout)
        return _build_stored(folder, section, train_sources, eval_sources, shards, tok, seed)

    artifact = build_or_reuse(layout, STAGE.name, parts or STAGE.key_parts(section, tokenizer, layout, seed), build)
    log_summary(artifact)
    return artifact


# Bump `version` when a code change must rebuild stored datasets (different blocks); editing code does not.
STAGE = Stage("prepare_dataset", version=2, components=components, build=prepare_dataset,
              libraries=("tokenizers", "transformers"))


def shards_to_tokenize(section: "DataSection", tokenizer: Artifact, layout: Layout) -> list[ShardTask]:
    """The shards prepare_dataset would tokenize (not in the token cache yet), for another executor to build with
    `shards.tokenize_task` first (the app layer's Dask task runner); prepare_dataset then finds them cached.
    Datasets cut by max_samples are left to prepare_dataset, which stops them after their first shards; a stream
    tokenizes only its eval datasets here."""
    train, evals = resolve_all(section)
    sources = [s for s in _unique(evals if section.streaming else train + evals)
               if section.max_samples is None or s.num_samples is not None]
    tasks, _ = plan_tasks(sources, {s.name: plan_shards(s) for s in sources}, tokenizer.digest, layout)
    return [task for ts in tasks.values() for task in ts if cached(layout, task) is None]


def _start_workers_early(sources: list[Source], section: "DataSection") -> None:
    """Boot the tokenizer workers' fork server while the tokenizer loads, when the corpus is big enough for a
    pool. Decided by file size alone (no look at the token cache first: that would delay it), so a re-pack of
    cached shards may boot it for nothing, in the background."""
    workers = section.preprocessing_num_workers or default_workers()
    if workers > 1 and sum(f.stat().st_size for s in sources for f in s.files) >= INLINE_BYTES:
        start_early()


def _check_streamable(sources: list[Source]) -> None:
    sampled = [s.describe() for s in sources if s.num_samples is not None]
    if sampled:
        raise DataError(f"data.streaming: num_samples (in dataset_info.json) of {', '.join(sampled)} samples from the "
                        "whole dataset, whose size a stream does not know; remove num_samples or set streaming: false")


def _build_stream(folder: Path, section: "DataSection", train_sources: list[Source], eval_sources: list[Source],
                  tok, tokenizer_digest: str, layout: Layout, seed: int) -> dict:
    """Streaming: write the stream plan and the eval blocks; the train stage tokenizes the rest as it goes."""
    plan = StreamPlan.for_sources(train_sources, section, seed)
    if eval_sources:
        shards = _tokenize(eval_sources, section, tok, tokenizer_digest, layout)
        held, written = _write_eval(folder, eval_sources, shards, section, seed, token_dtype(len(tok)), tok.pad_token_id)
        hold_out(plan, tok, 0)  # checks that the stream holds a training block
        sources, eval_blocks, eval_tokens = _source_stats(held, shards, "eval"), written.blocks, written.tokens
    else:
        blocks, starts = hold_out(plan, tok, int(section.val_size))
        np.save(folder / "eval.npy", blocks)
        if starts is not None:
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in starts])]).astype(np.int64)
            save_doc_starts(folder, "eval", offsets, np.concatenate(starts) if starts else np.zeros(0, np.int32))
        sources, eval_blocks, eval_tokens = {}, len(blocks), int(blocks.size)
    plan.save(folder)
    for source in train_sources:
        sources[source.name] = {"files": len(source.files), "shards": sum(sh.source == source.name for sh in plan.shards),
                                "bytes": sum(plan.files[str(f)]["size"] for f in source.files), "cache": "streamed"}
    return {"streaming": True, **_packing_stats(section, tok), "stream_shards": len(plan.shards),
            "stream_bytes": plan.total_bytes,
            "stream_start": plan.start.to_json(), "eval_blocks": eval_blocks, "eval_tokens": eval_tokens,
            "sources": sources}


def _packing_stats(section: "DataSection", tok) -> dict:
    """How the blocks were made, for the manifest (both the stored and the streamed path)."""
    return {"cutoff_len": section.cutoff_len, "packing": section.packing, "doc_mask": section.doc_mask,
            "mix_strategy": section.mix_strategy, "dtype": token_dtype(len(tok)).name,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _tokenize(sources: list[Source], section: "DataSection", tok, tokenizer_digest: str,
              layout: Layout) -> dict[str, SourceShards]:
    """Every shard of `sources` through the token cache; max_samples stops a source early (num_samples draws
    from the whole source)."""
    limits = {s.name: section.max_samples for s in sources if s.num_samples is None}
    return tokenize_sources(sources, {s.name: plan_shards(s) for s in sources}, tok, tokenizer_digest, layout,
                            workers=section.preprocessing_num_workers or default_workers(),
                            batch_size=section.preprocessing_batch_size, doc_limits=limits)


def _build_stored(folder: Path, section: "DataSection", train_sources: list[Source], eval_sources: list[Source],
                  shards: dict[str, SourceShards], tok, seed: int) -> dict:
    """Pack the training documents into train.npy and the eval documents (val_size's held-out ones, or
    eval_dataset) into eval.npy, block by block; returns the manifest stats."""
    dtype = token_dtype(len(tok))
    train = DocumentOrder.of(train_sources, shards, section, seed, section.mix_strategy, "train")
    if not count_blocks(train, section):
        raise DataError(f"data.dataset: {train.total} tokens make no block of cutoff_len={section.cutoff_len}; "
                        "add data or lower data.cutoff_len")
    stats = _packing_stats(section, tok)
    stats["sources"] = _source_stats(train, shards)
    if eval_sources or section.val_size:
        held, evals = _write_eval(folder, eval_sources or train_sources, shards, section, seed, dtype,
                                  tok.pad_token_id)
        stats["sources"].update(_source_stats(held, shards, "eval"))
    else:
        evals = write_blocks(DocumentOrder.empty(), section, folder, dtype, tok.pad_token_id, "eval")
    written = write_blocks(train, section, folder, dtype, tok.pad_token_id, "train")
    stats.update(train_blocks=written.blocks, eval_blocks=evals.blocks, train_tokens=written.tokens,
                 eval_tokens=evals.tokens, dropped_tokens=written.dropped + evals.dropped,
                 padding_tokens=written.padding + evals.padding,
                 shards_reused=sum(s.reused for s in shards.values()),
                 shards_built=sum(s.built for s in shards.values()))
    return stats


def _write_eval(folder: Path, sources: list[Source], shards: dict[str, SourceShards], section: "DataSection",
                seed: int, dtype: np.dtype, pad_id: int) -> tuple[DocumentOrder, Written]:
    """eval.npy: data.eval_dataset packed in order, or the documents val_size holds out of the training mix,
    packed on their own; a DataError when they make no block."""
    if section.eval_dataset:
        held = DocumentOrder.of(sources, shards, section, seed, "concat")
        key, fix = "data.eval_dataset", "add eval data or lower data.cutoff_len"
    else:
        held = DocumentOrder.of(sources, shards, section, seed, section.mix_strategy, "eval")
        shown = int(section.val_size) if section.val_size >= 1 else section.val_size
        key = f"data.val_size: {shown}:"
        fix = (f"{sum(n for n, _ in held.per_source.values())} documents are held out; raise data.val_size or lower "
               "data.cutoff_len")
    if not count_blocks(held, section):
        raise DataError(f"{key} {held.total} tokens make no block of cutoff_len={section.cutoff_len}; {fix}")
    return held, write_blocks(held, section, folder, dtype, pad_id, "eval")


def _unique(sources: list[Source]) -> list[Source]:
    return list({s.name: s for s in sources}.values())


# --------------------------------------------------------------------------- stats and reading


def _source_stats(assembled: DocumentOrder, shards: dict[str, SourceShards], split: str = "train") -> dict:
    out = {}
    for name, (documents, tokens) in assembled.per_source.items():
        s = shards[name]
        entry = {"documents": documents, "tokens": tokens, "mean_doc_tokens": round(tokens / max(documents, 1), 1),
                 "files": len(s.source.files), "shards": len(s.shards), "shards_reused": s.reused,
                 "cache": s.reason}
        out[name if split == "train" else f"{name} (eval)"] = entry
    return out


def log_summary(artifact: Artifact) -> None:
    """The per-dataset table and the block counts, from the manifest (also on a hit)."""
    stats = artifact.stats
    if stats.get("streaming"):
        log.info("prepare_dataset: %s %s: streaming %d shards (%.1f MiB) of %s in reading order; %d eval blocks of "
                 "%d tokens held out; training tokenizes as it reads", "reused" if artifact.hit else "planned",
                 artifact.key[:12], stats["stream_shards"], stats["stream_bytes"] / 2**20,
                 ", ".join(n for n, s in stats["sources"].items() if s.get("cache") == "streamed"),
                 stats["eval_blocks"], stats["cutoff_len"])
        return
    rows = [("dataset", "shards", "reused", "documents", "tokens", "mean", "token cache")]
    for name, s in stats.get("sources", {}).items():
        rows.append((name, str(s.get("shards", "")), str(s.get("shards_reused", "")), f"{s['documents']:,}",
                     f"{s['tokens']:,}", f"{s['mean_doc_tokens']:.1f}", s.get("cache", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1]
             for r in rows]
    what = "reused" if artifact.hit else "built"
    log.info("prepare_dataset: %s %s\n  %s", what, artifact.key[:12], "\n  ".join(lines))
    unit = "blocks" if stats.get("packing", True) else "documents (one block each)"
    log.info("prepare_dataset: %d train and %d eval %s of %d tokens; %d tokens dropped (%s), %d padding",
             stats.get("train_blocks", 0), stats.get("eval_blocks", 0), unit, stats.get("cutoff_len", 0),
             stats.get("dropped_tokens", 0),
             "final partial block only" if stats.get("packing", True) else "cut by cutoff_len",
             stats.get("padding_tokens", 0))


def open_blocks(artifact: Artifact | str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped blocks of one split (and per-block lengths when packing was off)."""
    folder = Path(artifact.path if isinstance(artifact, Artifact) else artifact)
    blocks = np.load(folder / f"{split}.npy", mmap_mode="r")
    lengths_path = folder / f"{split}_lengths.npy"
    return blocks, (np.load(lengths_path) if lengths_path.exists() else None)


def open_doc_starts(artifact: Artifact | str | Path, split: str) -> DocStarts | None:
    """Per-block document starts of one split (`starts[i]` for block i), or None when doc_mask was off."""
    return load_doc_starts(Path(artifact.path if isinstance(artifact, Artifact) else artifact), split)
